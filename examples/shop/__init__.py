"""The shop demo: the order and payment services' events and the shop's OLTP database.

Its producers stand in for a real shop's systems: :mod:`examples.shop.simulator` sends
``order_placed`` and ``payment_attempted`` events, :mod:`examples.shop.oltp` writes customers
and call-centre calls to the OLTP database as concurrent clients. ``catalog.yaml`` declares
what the engine loads from them, and its ``local:`` section tells ``kappa up`` how to prepare
the OLTP tables and which producers to run. Their settings are in :mod:`examples.shop.settings`.
"""
