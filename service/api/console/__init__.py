"""The web console under `/ui/`: server-rendered pages on the API's own app, reading and acting through the same
repository and actions as the JSON API, signed in with an API key; a small script of its own adds live updates
from the event streams. Nothing is fetched from anywhere but this service."""
