"""What data exists: event-store topics, the EDW facts loaded from them."""
