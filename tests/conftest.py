pytest_plugins = ["storage_servers"]
