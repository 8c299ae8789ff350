"""`manage.py issue_token`."""
