"""KD Studio's Django project: settings, URLs, ASGI routing and the studio app."""
