"""The sandbox: a pure spec, the root launcher that applies it, cgroups and uids."""
