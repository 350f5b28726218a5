"""The default encoder shipped with streamsim (version 1 of every new store); see MODEL_CARD.md."""
