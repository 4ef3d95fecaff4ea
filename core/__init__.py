"""The bottom layer every stage may import: the user-error base class, atomic file writes, the command-line
error wrapper, the tool's version.  It imports nothing from the other stages (torch only lazily)."""
