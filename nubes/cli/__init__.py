"""The `nubes` command line: one Typer app, one module per resource group."""
