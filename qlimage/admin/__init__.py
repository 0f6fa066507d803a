"""What an admin changes with a command rather than a text editor: files of overlays and Root FS
Customization configs (the editor), hand edits of published images, root passwords, UnionFS
chroots, and the status report. Each operation takes the build lock and rebuilds what it
changed through `tasks.run.run_graph`."""
