"""Management commands of the studio app."""
