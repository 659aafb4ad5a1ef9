"""Stand-in for `comfy.utils`: the ProgressBar, recording every update for the tests."""

BARS: list["ProgressBar"] = []  # every bar created, in order


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.node_id = node_id
        self.values: list[int] = []
        BARS.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        self.values.append(self.current)

    def update(self, value):
        self.update_absolute(self.current + value)
