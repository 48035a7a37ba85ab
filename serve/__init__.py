"""``python cli.py serve``: a local web application to search a collection (engine, Flask app, pages)."""
