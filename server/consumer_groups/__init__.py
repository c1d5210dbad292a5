"""Consumer groups: competing consumers with server-side checkpoints, acks and parking.

``model`` holds the rules' vocabulary, ``balance`` the partition assignment, ``engine``
one group's delivery on this process, ``service`` the groups of a gateway, ``ports`` what
a store keeps for them (``store_memory``, ``store_sqlite``, ``store_postgres``), and
``servicer`` the gRPC service.
"""
