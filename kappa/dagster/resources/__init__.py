"""Resources of kappa's assets and sensors: the event store, the EDW, the OLTP database, the state cache."""
