"""One module per platform: connect with the platform's own SDK, pull, normalize."""
