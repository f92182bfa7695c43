"""Several shellserver nodes as one service, coordinated through Redis
(docs/cluster.md): the Redis link, membership, placement and admission."""
