"""The judge role: a learned reward model (an SFT'd yes/no verdict) that scores open-ended tasks in RL."""
