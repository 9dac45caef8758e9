"""Real-time inference worker for sensor readings in PostgreSQL."""
