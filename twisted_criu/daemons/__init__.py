"""The two daemons, embeddable: proxy and cache services, their sessions, control API, metrics."""
