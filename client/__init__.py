"""pstrain client: the Keras-style API (client.nn), datasets and the psctl CLI."""
