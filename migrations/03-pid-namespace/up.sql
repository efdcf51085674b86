-- The PID namespace of a run's process (inode of /proc/self/ns/pid): its pid means something only there.
ALTER TABLE runs ADD COLUMN pid_ns INTEGER;
