"""The studio app: datasets, checkpoints, experiments, their REST API and live WebSocket."""
