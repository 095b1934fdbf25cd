"""Host adapters: the only modules that know the WebUI (A1111, Forge) or its API."""
