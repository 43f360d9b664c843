"""tune: placeholder package; see README roadmap."""
