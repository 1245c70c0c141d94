"""DReSD's proposer: drafting from dense retrieval and the request's context, priced per token."""
