"""RL-DARTS (Miao et al. 2021, spec/methods.md §11): a DARTS CNN cell searched inside a PPO
agent on a MinAtar game, read out, retrained and compared with the hand-designed encoder.

Modules, one job each: ``envs`` (the games, vectorised and checkpointable), ``ppo`` (GAE and
the clipped loss), ``agent`` (encoders and heads), ``loop`` (PPO's training loop), ``run``
(the whole run), ``plots`` (learning curves), ``kind`` (``--task rl``, the task kind).
"""
