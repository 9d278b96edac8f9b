"""PostgreSQL: schema migrations, the embedded server, connection helpers."""
