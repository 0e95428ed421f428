"""Analyses: read the graph, write ``node.meta``; never modify the graph."""
