"""The built-in stages: identify → tokenize → cache-lookup → schedule → decode → persist."""
