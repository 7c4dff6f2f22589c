"""What every stage shares: errors, atomic files, progress bars, machine info, tables. No torch, no backend."""
