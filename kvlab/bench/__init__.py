"""Long-context tasks and their building blocks (haystack text, needles)."""
