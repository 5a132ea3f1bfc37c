"""Integrations with other libraries, each imported only by the user who needs it
(``import hlora.integrations.transformers`` imports transformers; ``import hlora`` does not)."""
