"""robustkd's built-in task plug-ins (images, text, speech): the folder ``tasks/`` in the repository,
installed as the package ``robustkd_tasks`` and registered through robustkd's own ``robustkd.tasks``
entry points -- the route a third-party plug-in takes. Importing this package registers nothing;
importing a module (``robustkd_tasks.image``) does."""
