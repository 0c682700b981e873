"""The chat prompts a draft is distilled on and judged by, generated here (nothing downloaded).

Requests a user of a small assistant would type: a task template filled with a topic. The held-out set
shares no topic and no template with the training set, so acceptance measured on it is acceptance on
questions the draft never saw the target answer.
"""

from __future__ import annotations

import random

__all__ = ["train_prompts", "held_out_prompts"]

TRAIN_TEMPLATES = (
    "What is {}?", "Explain {} in simple terms.", "Give me three interesting facts about {}.",
    "Write a short poem about {}.", "Why is {} important?", "How does {} work?",
    "Summarize what you know about {} in a few sentences.", "What are the pros and cons of {}?",
    "Teach a ten-year-old about {}.", "Write a short story involving {}.",
    "What are common misconceptions about {}?", "Describe {} to someone who has never heard of it.",
)
HELD_OUT_TEMPLATES = (
    "Can you tell me about {}?", "Write a haiku about {}.", "List some tips related to {}.",
    "What should a beginner know about {}?",
)
TRAIN_TOPICS = (
    "volcanoes", "coffee", "the moon", "photosynthesis", "lists in Python", "the French Revolution", "black holes",
    "bicycles", "sleep", "honey bees", "rainbows", "chess", "the internet", "vaccines", "glaciers", "jazz",
    "the stock market", "dinosaurs", "recycling", "electric cars", "the human heart", "gravity", "origami",
    "the Roman Empire", "climate change", "machine learning", "bread baking", "the ocean", "friendship",
    "solar panels", "earthquakes", "the piano", "meditation", "democracy", "spiders", "the printing press",
    "cloud computing", "tea", "marathons", "the immune system", "poetry", "DNA", "airplanes", "deserts",
    "time management", "the Great Wall of China", "penguins", "public speaking", "antibiotics", "the Olympics",
    "video games", "mushrooms", "renewable energy", "the moon landing", "cats", "budgeting", "thunderstorms",
    "the alphabet", "submarines", "gardening", "bridges", "sharks", "the water cycle", "libraries",
)
HELD_OUT_TOPICS = (
    "hurricanes", "chocolate", "Mars", "the brain", "sorting algorithms", "ancient Egypt", "telescopes",
    "yoga", "owls", "the violin", "coral reefs", "wind turbines", "exercise", "maps", "trains", "volunteering",
)


def train_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct training requests (templates x topics, shuffled with ``seed``)."""
    pool = [template.format(topic) for topic in TRAIN_TOPICS for template in TRAIN_TEMPLATES]
    random.Random(seed).shuffle(pool)
    if count > len(pool):
        raise ValueError(f"at most {len(pool)} training prompts, not {count}")
    return pool[:count]


def held_out_prompts(count: int, seed: int = 1) -> list[str]:
    """``count`` held-out requests: topics and templates the training set never uses."""
    pool = [template.format(topic) for topic in HELD_OUT_TOPICS for template in HELD_OUT_TEMPLATES]
    random.Random(seed).shuffle(pool)
    return pool[:count]
