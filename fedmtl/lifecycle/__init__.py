"""The life of a trained model and of the data it came from: checkpoints and resume, warm
start from the champion, cold start of a new client, promotion gates, provenance (data and
code versions), the refresh of the DVC data."""
