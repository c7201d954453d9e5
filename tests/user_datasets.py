"""A user-defined raw dataset, as a user writes it; tests import it with import_user_modules."""

from ppo.data import RawDataset, RawSample

TOPICS = ["cat", "dog", "river", "city", "garden", "forest", "train", "house", "song", "book"]


class MyRawDataset(RawDataset):
    NAME = "my-dataset-name"

    def __init__(self, path=None):
        # Ten pairs: a kind answer and an unkind one; the kind one comes first on even rows.
        self.rows = []
        for i, topic in enumerate(TOPICS):
            kind, unkind = f"The {topic} is kind and warm.", f"The {topic} is rude and cold."
            self.rows.append((f"Tell me about the {topic}.", kind, unkind) if i % 2 == 0 else
                             (f"Tell me about the {topic}.", unkind, kind))

    def __getitem__(self, index) -> RawSample:
        prompt, answer, other_answer = self.rows[index]
        return RawSample(input=prompt, answer=answer, other_answer=other_answer, better=index % 2 == 0)

    def __len__(self):
        return len(self.rows)
