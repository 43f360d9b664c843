"""serving: placeholder package; see README roadmap."""
