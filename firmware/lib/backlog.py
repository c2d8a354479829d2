# Readings kept while offline: a bounded RAM ring that spills, as a whole, to a file on flash.
# Order: every file entry is older than every RAM entry, so replay = file (from its head) then RAM.
# When RAM + file hold `ram + file_max` entries, the oldest is dropped and counted (take_drops()).
# The spill file survives a reboot and is replayed after the next connect (entries carry their own
# boot id and seq, so a replay is harmless).
import os

FILE = "backlog.jsonl"


class Backlog:
    def __init__(self, ram=16, file_max=500, path=FILE):
        self.ram = [None] * ram
        self.cap = ram
        self.head = 0  # oldest RAM entry
        self.n = 0  # RAM entries
        self.file_max = file_max
        self.path = path
        self.f_off = 0  # byte offset of the oldest unread file entry
        self.f_n = 0  # unread entries in the file
        self.f_dead = 0  # consumed/dropped lines still physically in the file
        self.drops = 0
        self._plen = 0
        self._recover()

    def _save_pos(self):
        # where the unread part of the file starts, so a reboot neither replays consumed entries
        # (at most a few: saved on spill and every 16 pops) nor resurrects dropped ones
        try:
            with open(self.path + ".pos", "w") as f:
                f.write(str(self.f_off))
        except OSError:
            pass

    def _recover(self):
        try:
            with open(self.path + ".pos") as f:
                self.f_off = int(f.read())
        except (OSError, ValueError):
            self.f_off = 0
        try:
            with open(self.path) as f:
                f.seek(self.f_off)
                for line in f:
                    if line.strip():
                        self.f_n += 1
        except OSError:
            return
        if self.f_n:
            print("backlog: %d readings from flash to replay" % self.f_n)
        while self.f_n > self.file_max:
            self._drop_file_head()

    def __len__(self):
        return self.n + self.f_n

    def take_drops(self):
        d = self.drops
        self.drops = 0
        return d

    def push(self, item):
        """item: str (one JSON document, no newline)."""
        if self.n == self.cap:
            self._spill()
        self.ram[(self.head + self.n) % self.cap] = item
        self.n += 1

    def _spill(self):
        if self.file_max == 0:
            self.ram[self.head] = None  # no flash backlog: drop the oldest RAM entry
            self.head = (self.head + 1) % self.cap
            self.n -= 1
            self.drops += 1
            return
        try:
            with open(self.path, "a") as f:
                while self.n:
                    f.write(self.ram[self.head])
                    f.write("\n")
                    self.ram[self.head] = None
                    self.head = (self.head + 1) % self.cap
                    self.n -= 1
                    self.f_n += 1
        except OSError as e:
            print("backlog: spill to flash failed (%s), dropping oldest" % e)
            if self.n == self.cap:
                self.ram[self.head] = None
                self.head = (self.head + 1) % self.cap
                self.n -= 1
                self.drops += 1
        while self.f_n > self.file_max:
            self._drop_file_head()
        if self.f_dead > self.file_max // 2 + 8:
            self._compact()
        self._save_pos()

    def _read_head(self):
        with open(self.path) as f:
            f.seek(self.f_off)
            return f.readline()

    def _drop_file_head(self):
        self._plen = 0
        line = self._read_head()
        self.f_off += len(line)  # text == bytes: payloads are ASCII (json escapes the rest)
        self.f_n -= 1
        self.f_dead += 1
        self.drops += 1

    def _compact(self):
        tmp = self.path + ".tmp"
        with open(self.path) as src, open(tmp, "w") as dst:
            src.seek(self.f_off)
            for line in src:
                dst.write(line)
        os.rename(tmp, self.path)
        self.f_off = 0
        self.f_dead = 0

    def peek(self):
        """Oldest entry, or None."""
        if self.f_n:
            line = self._read_head()
            if line:
                self._plen = len(line)
                return line.rstrip("\n")
            self._reset_file()  # file shorter than expected: forget it
        if self.n:
            return self.ram[self.head]
        return None

    def pop(self):
        """Remove the entry peek() returned."""
        if self.f_n:
            n, self._plen = self._plen, 0
            self.f_off += n or len(self._read_head())
            self.f_n -= 1
            self.f_dead += 1
            if not self.f_n:
                self._reset_file()
            elif not self.f_dead & 15:
                self._save_pos()
            return
        if self.n:
            self.ram[self.head] = None
            self.head = (self.head + 1) % self.cap
            self.n -= 1

    def _reset_file(self):
        self.f_n = self.f_off = self.f_dead = 0
        for p in (self.path, self.path + ".pos"):
            try:
                os.remove(p)
            except OSError:
                pass
