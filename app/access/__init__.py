"""Access control below the HTTP layer: the scope grammar (scopes.py), API keys and the
per-process key cache (keys.py), and the `sluice keys` commands (cli.py). The check in
front of the routes is the API's (api/access.py); the SQL is storage's (storage/keys.py)."""
