"""What a run leaves behind: files written atomically, run folders, results, figures, reports."""
