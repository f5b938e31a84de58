"""Assets built from a catalogue: topic and change-table sources, facts, captured targets, checks."""
