"""Learning from people's favourites: the preference store, the rating gallery and its worker."""
