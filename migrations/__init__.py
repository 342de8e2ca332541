"""The SQL migrations, installed as the package asyncproc.migrations (setup.cfg's package_dir).

A package so that every install, a wheel included, carries them where
importlib.resources finds them; asyncproc/migrate.py reads only the .sql files:
the versioned migrations here and the current-state files in current/.
"""
