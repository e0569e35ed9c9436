"""The LightningModules: glue between networks, losses, optimisers and logging — no math here."""
