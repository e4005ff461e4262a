"""Graph passes over the captured step: locate attention sites, rewrite them onto packed caches."""
