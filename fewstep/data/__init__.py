"""Real data (digits, image folders, `datasets`) and the classifier featurizer trained on it: used by every
pipeline that trains a teacher from data, whatever its family."""
