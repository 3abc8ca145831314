// Class names on the command line: output files carry a file-safe form of the class name
// ("Ankle boot" → "Ankle_boot"), and every flag that takes class names accepts that form too, so a
// file name can be pasted back into `--class` / `--labels`.

/** The class name as it appears in output file names: runs of anything but letters, digits, '-' and '_' become '_'. */
export function classFileName(name: string): string {
  return name.replace(/[^A-Za-z0-9_-]+/g, '_');
}

/**
 * Index of the class `text` names: its name (case-insensitive), else its file-name form
 * (case-insensitive); -1 when it names none.
 */
export function findClass(text: string, names: readonly string[]): number {
  const t = text.trim().toLowerCase();
  const exact = names.findIndex((n) => n.toLowerCase() === t);
  if (exact >= 0) return exact;
  return names.findIndex((n) => classFileName(n).toLowerCase() === t);
}

/** "0 T-shirt/top (T-shirt_top), 1 Trouser, …" for error messages. */
export function describeClasses(names: readonly string[]): string {
  return names.map((n, i) => `${i} ${n}${classFileName(n) !== n ? ` (${classFileName(n)})` : ''}`).join(', ');
}
