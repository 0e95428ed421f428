"""Sparse training passes (SWAT, dynamic sparse training) and their controllers."""
