"""When work starts: sensors that poll the event store and launch micro-batch runs."""
