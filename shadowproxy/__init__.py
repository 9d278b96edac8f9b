"""shadowproxy: mirror production traffic to shadow model services and record the pairs.

The proxy returns the primary's response to the caller, sends the same request to each
shadow in the background, and writes every exchange to PostgreSQL for SQL queries and
`shadowproxy report`.
"""

__version__ = "0.1.0"
