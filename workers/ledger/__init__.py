"""The token ledger: its rules as pure computation (``rules``) and the store that loads
customers and grants and writes what the rules produced (``store``)."""
