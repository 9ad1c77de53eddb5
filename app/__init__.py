"""The Dash workbench app. Not built yet: see the app issue."""
