"""Task configuration (models, loading with every problem located) and process settings."""
