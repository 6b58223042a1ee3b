"""Text attacks: BadNet, AddSent, Syntactic (HiddenKiller) and Style (StyleBkd)."""
