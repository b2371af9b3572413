"""The records nubes keeps in the store, one module per kind, validated by pydantic."""
